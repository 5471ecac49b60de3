//! The sandbox boundary on the node side (issue 9): the host never follows a path a sandbox could
//! have touched (F7), each sandbox has its own per-user kernel counters (K12), nothing inside
//! names another sandbox or a host path (K13), a noisy sandbox stays in its CPU and disk budget
//! (R4), TIOCSTI reaches nothing (K11), and the top uid slot maps where it should. Each test runs
//! from inside real sandboxes of a real `burrow up` (or the real namespace backend) and checks
//! the host with its own sentinels.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burrow_client::{Client, Output};
use burrow_types::{CreateSandbox, ExecRequest, RunSpec};
use common::*;

/// Host pid of sandbox `id`'s PID 1 (its guest agent), found through its pids cgroup.
fn pid1(id: &str) -> u32 {
    let procs = std::fs::read_to_string(format!("/sys/fs/cgroup/pids/burrow/{id}/cgroup.procs"))
        .unwrap_or_else(|e| panic!("sandbox {id} has no pids cgroup: {e}"));
    procs
        .lines()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("NSpid:"))
                .and_then(|l| l.split_whitespace().last())
                == Some("1")
        })
        .unwrap_or_else(|| panic!("no PID 1 among {procs:?}"))
        .parse()
        .unwrap()
}

/// What the host can see of one of its own files or directories without following links: a
/// write, a truncation or a chown through a sandbox's link changes it.
#[derive(Debug, PartialEq)]
struct Print {
    kind: &'static str,
    len: u64,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime_ns: i64,
    ctime_ns: i64,
    /// FNV-1a of the first 4 KiB (all of a procfs file).
    head: u64,
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x100000001b3)
    })
}

/// A disk image in use changes its times and blocks by itself: only a write through a link (which
/// truncates it) or a chown shows.
fn print_disk(p: &Path) -> Print {
    Print {
        mtime_ns: 0,
        ctime_ns: 0,
        head: 0,
        ..print(p)
    }
}

fn print(p: &Path) -> Print {
    let md = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let head = if md.is_file() && p.starts_with("/proc") {
        std::fs::read(p).unwrap()
    } else if md.is_file() {
        use std::io::Read;
        let mut b = vec![0u8; 4096];
        let mut f = std::fs::File::open(p).unwrap();
        let n = f.read(&mut b).unwrap();
        b.truncate(n);
        b
    } else {
        Vec::new()
    };
    Print {
        kind: if md.is_dir() { "dir" } else { "file" },
        // procfs files report size 0 whatever they hold; their content is in `head`.
        len: md.len(),
        uid: md.uid(),
        gid: md.gid(),
        mode: md.mode(),
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        ctime_ns: if p.starts_with("/proc") {
            0
        } else {
            md.ctime() * 1_000_000_000 + md.ctime_nsec()
        },
        head: fnv(&head),
    }
}

fn prints(paths: &[PathBuf]) -> BTreeMap<PathBuf, Print> {
    paths
        .iter()
        .map(|p| {
            let disk = p.file_name() == Some(std::ffi::OsStr::new("disk.img"));
            (p.clone(), if disk { print_disk(p) } else { print(p) })
        })
        .collect()
}

/// Puts the host's domain name back even if the test fails half-way (on a broken build the host
/// writes the sandbox's hostname into it).
struct RestoreDomainname(String);

impl Drop for RestoreDomainname {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/domainname", &self.0);
    }
}

/// A server with two sandboxes, or `None` (and why) without root.
async fn two_sandboxes() -> Option<(TestServer, Client, String, String)> {
    if !require_root("starting sandboxes") {
        return None;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let a = c.create(&CreateSandbox::default()).await.unwrap().id;
    let b = c.create(&CreateSandbox::default()).await.unwrap().id;
    Some((srv, c, a, b))
}

async fn ok(c: &Client, id: &str, script: &str) -> String {
    let r = run(c, id, script).await;
    assert_eq!(r.exit_code, Some(0), "{script}: {r:?}");
    r.stdout
}

/// Every host sentinel still as it was, and sandbox `b` (whose disk is one of them) still has its
/// file.
async fn assert_host_intact(
    c: &Client,
    before: &BTreeMap<PathBuf, Print>,
    b: &str,
    step: &str,
    srv: &TestServer,
) {
    for (p, now) in prints(&before.keys().cloned().collect::<Vec<_>>()) {
        let was = &before[&p];
        assert_eq!(
            &now,
            was,
            "{step}: the host changed {} through a sandbox's link\n{}",
            p.display(),
            srv.log()
        );
    }
    assert_eq!(
        ok(c, b, "cat /workspace/b-data").await,
        "b's own\n",
        "{step}: the other sandbox lost its file"
    );
}

// ---------------------------------------------------------------- F7

/// Attack list row F7: a sandbox replaces every file and directory the host used to write or
/// chown (`/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`, `/var`, image directories, the run
/// file) with links to host sentinels: a file in the data directory, the server's `secret`, another
/// sandbox's `disk.img`, directories of the data directory and a `/proc/sys` file. Pause and
/// resume, hibernate and cold resume (twice), a warm claim and a delete leave every sentinel
/// byte for byte, owner and time as it was. Runs with networking, so `resolv.conf` is written.
#[tokio::test(flavor = "multi_thread")]
async fn f7_links_swapped_into_host_touched_paths_are_never_followed() {
    if !require_root("starting sandboxes") {
        return;
    }
    let pools = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pools.path(), r#"{"f7": {"plan": "pro", "size": 1}}"#).unwrap();
    let srv = TestServer::start_in_world(&["--pools", pools.path().to_str().unwrap()]).await;
    let c = srv.client();
    let a = c.create(&CreateSandbox::default()).await.unwrap().id;
    let b = c.create(&CreateSandbox::default()).await.unwrap().id;
    ok(&c, &b, "echo \"b's own\" > /workspace/b-data && sync").await;

    let data = srv.data.clone();
    let sentinel = data.join("sentinel");
    std::fs::write(&sentinel, "host sentinel\n").unwrap();
    let var = data.join("sentinel-var");
    let home = data.join("sentinel-home");
    for d in ["lib", "tmp", "cache", "log"] {
        std::fs::create_dir_all(var.join(d)).unwrap();
    }
    std::fs::create_dir_all(home.join("user")).unwrap();
    let b_disk = data.join("sandboxes").join(&b).join("disk.img");
    let domainname = PathBuf::from("/proc/sys/kernel/domainname");
    let _restore = RestoreDomainname(std::fs::read_to_string(&domainname).unwrap());
    let mut watched = vec![
        sentinel.clone(),
        data.join("secret"),
        b_disk.clone(),
        var.clone(),
        home.clone(),
        home.join("user"),
        domainname.clone(),
    ];
    watched.extend(["lib", "tmp", "cache", "log"].map(|d| var.join(d)));
    let before = prints(&watched);

    let swap = |links: &[(&str, &Path)]| {
        links
            .iter()
            .map(|(inside, host)| format!("rm -rf {inside} && ln -s {} {inside}", host.display()))
            .collect::<Vec<_>>()
            .join(" && ")
    };
    let round1 = swap(&[
        ("/etc/hostname", &sentinel),
        ("/etc/hosts", &data.join("secret")),
        ("/etc/resolv.conf", &b_disk),
        ("/var", &var),
        ("/home", &home),
    ]);
    ok(&c, &a, &format!("{round1} && mkdir -p /etc/burrow && rm -f /etc/burrow/run.json && ln -s {} /etc/burrow/run.json && sync", sentinel.display())).await;

    c.pause(&a).await.unwrap();
    c.resume(&a).await.unwrap();
    assert_host_intact(&c, &before, &b, "pause + resume", &srv).await;

    c.hibernate(&a).await.unwrap();
    assert_host_intact(&c, &before, &b, "hibernate", &srv).await;
    let resumed = c.resume(&a).await;
    assert_host_intact(&c, &before, &b, "cold resume", &srv).await;
    resumed.unwrap_or_else(|e| {
        panic!(
            "cold resume of a sandbox with swapped links: {e}\n{}",
            srv.log()
        )
    });
    // The sandbox's own files were rewritten inside it, in place of its links.
    assert_eq!(
        ok(
            &c,
            &a,
            "test -L /etc/hostname && echo link; cat /etc/hostname"
        )
        .await,
        format!("{a}\n")
    );
    assert!(ok(&c, &a, "cat /etc/resolv.conf")
        .await
        .contains("nameserver"));

    // Round two: the host's own sysctl, then another cold start.
    let round2 = swap(&[("/etc/hostname", &domainname), ("/etc/hosts", &sentinel)]);
    ok(&c, &a, &format!("{round2} && sync")).await;
    c.hibernate(&a).await.unwrap();
    let resumed = c.resume(&a).await;
    assert_host_intact(&c, &before, &b, "second cold resume", &srv).await;
    resumed.unwrap();

    // A warm sandbox whose files were swapped (from the host, standing in for a hostile image)
    // is claimed with a hostname and a run: whatever the claim does, the host is untouched.
    let warm = wait_for_warm(&srv, &[&a, &b]).await;
    let root = PathBuf::from(format!("/proc/{}/root", pid1(&warm)));
    for (inside, host) in [
        ("etc/hostname", &sentinel),
        ("etc/hosts", &data.join("secret")),
    ] {
        std::fs::remove_file(root.join(inside)).unwrap();
        std::os::unix::fs::symlink(host, root.join(inside)).unwrap();
    }
    let claimed = c
        .create(&CreateSandbox {
            plan: Some("pro".into()),
            hostname: Some("claimed-f7".into()),
            run: Some(RunSpec {
                task: "f7".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    assert_host_intact(&c, &before, &b, "warm claim", &srv).await;
    // The guest writes the claim's files inside the sandbox, where those links lead nowhere: the
    // claim fails, the tampered sandbox is destroyed and the create goes cold.
    let sb = claimed.unwrap_or_else(|e| panic!("create: {e}\n{}", srv.log()));
    if !sb.warm_hit {
        assert_eq!(host_leftovers(&srv, &warm), Vec::<String>::new());
    }
    c.delete(&sb.id).await.unwrap();
    assert_host_intact(&c, &before, &b, "delete of the claimed sandbox", &srv).await;

    c.delete(&a).await.unwrap();
    assert_host_intact(&c, &before, &b, "delete", &srv).await;
    assert_eq!(host_leftovers(&srv, &a), Vec::<String>::new());
}

/// The id of the pool's ready sandbox (the one sandbox directory that is not one of `known`).
async fn wait_for_warm(srv: &TestServer, known: &[&str]) -> String {
    let c = srv.client();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = c.pools().await.unwrap().iter().any(|p| p.ready > 0);
        let dirs: Vec<String> = srv
            .host_sandbox_dirs()
            .into_iter()
            .filter(|d| !known.contains(&d.as_str()))
            .collect();
        if ready && dirs.len() == 1 {
            return dirs[0].clone();
        }
        assert!(Instant::now() < deadline, "no warm sandbox: {dirs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------- K12

/// Exhausts every per-user kernel counter a sandbox can reach and prints how far it got, as
/// `{"counter": [count, errno]}`; then holds it all until killed.
const EXHAUST: &str = r#"
import ctypes, json, os, signal, time
libc = ctypes.CDLL(None, use_errno=True)
res = {}
# Opened first: exhausting the fd table must not keep the result from being written.
out = open("/tmp/k12.json.tmp", "w")
def until_fail(f, cap):
    n = 0
    while n < cap:
        if f(n) < 0:
            return [n, ctypes.get_errno()]
        n += 1
    return [n, 0]
fds = []
def ino(n):
    fd = libc.inotify_init1(0)
    if fd >= 0: fds.append(fd)
    return fd
res["inotify_instances"] = until_fail(ino, 100000)
os.makedirs("/tmp/w", exist_ok=True)
paths = []
for i in range(4000):
    p = "/tmp/w/%d" % i
    open(p, "w").close()
    paths.append(p.encode())
def watch(n):
    return libc.inotify_add_watch(fds[n % len(fds)], paths[n // len(fds)], 2)
res["inotify_watches"] = until_fail(watch, len(fds) * len(paths))
FAN_REPORT_FID = 0x200
res["fanotify_groups"] = until_fail(lambda n: libc.fanotify_init(FAN_REPORT_FID, os.O_RDONLY), 100000)
class MqAttr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long), ("msgsize", ctypes.c_long), ("curmsgs", ctypes.c_long), ("pad", ctypes.c_long * 4)]
attr = MqAttr(0, 10, 8192, 0)
libc.mq_open.restype = ctypes.c_int
res["posix_mqueue_bytes"] = until_fail(lambda n: libc.mq_open(b"/k12-%d" % n, os.O_CREAT | os.O_RDWR, 0o600, ctypes.byref(attr)), 10000)
res["sysv_msg_queues"] = until_fail(lambda n: libc.msgget(0, 0o1000 | 0o600), 100000)
ptys = []
def pty(n):
    try:
        ptys.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
        return 0
    except OSError as e:
        ctypes.set_errno(e.errno)
        return -1
res["ptys"] = until_fail(pty, 100000)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
me = os.getpid()
res["pending_signals"] = until_fail(lambda n: libc.sigqueue(me, signal.SIGRTMIN, ctypes.c_void_p(0)), 1000000)
json.dump(res, out)
out.close()
os.rename("/tmp/k12.json.tmp", "/tmp/k12.json")
time.sleep(3600)
"#;

/// Takes one of each counter and gives it back; prints `{"counter": errno}` (0: it worked).
const TAKE_ONE: &str = r#"
import ctypes, json, os, signal
libc = ctypes.CDLL(None, use_errno=True)
res = {}
def rc(r):
    return 0 if r >= 0 else ctypes.get_errno()
fd = libc.inotify_init1(0)
res["inotify_instances"] = rc(fd)
res["inotify_watches"] = rc(libc.inotify_add_watch(fd, b"/tmp", 2)) if fd >= 0 else -1
res["fanotify_groups"] = rc(libc.fanotify_init(0x200, os.O_RDONLY))
class MqAttr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long), ("msgsize", ctypes.c_long), ("curmsgs", ctypes.c_long), ("pad", ctypes.c_long * 4)]
attr = MqAttr(0, 10, 8192, 0)
name = b"/k12-check-%d" % os.getpid()
res["posix_mqueue_bytes"] = rc(libc.mq_open(name, os.O_CREAT | os.O_RDWR, 0o600, ctypes.byref(attr)))
libc.mq_unlink(name)
q = libc.msgget(0, 0o1000 | 0o600)
res["sysv_msg_queues"] = rc(q)
if q >= 0:
    libc.msgctl(q, 0, None)
try:
    os.close(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
    res["ptys"] = 0
except OSError as e:
    res["ptys"] = e.errno
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
res["pending_signals"] = rc(libc.sigqueue(os.getpid(), signal.SIGRTMIN, ctypes.c_void_p(0)))
signal.sigtimedwait([signal.SIGRTMIN], 0)
print(json.dumps(res))
"#;

const COUNTERS: &[(&str, i64)] = &[
    ("inotify_instances", 24),  // EMFILE at fs.inotify.max_user_instances
    ("inotify_watches", 28),    // ENOSPC at fs.inotify.max_user_watches
    ("fanotify_groups", 24),    // EMFILE at fs.fanotify.max_user_groups
    ("posix_mqueue_bytes", 24), // EMFILE at RLIMIT_MSGQUEUE
    ("sysv_msg_queues", 28),    // ENOSPC at kernel.msgmni (per IPC namespace)
    ("pending_signals", 11),    // EAGAIN at RLIMIT_SIGPENDING
    ("ptys", 28), // ENOSPC at the sandbox's devpts `max` (kernel.pty.max is host-wide)
];

/// Attack list row K12: one sandbox exhausts every per-user kernel counter it can reach (and the
/// host-wide terminal pool, as far as its devpts lets it); another sandbox and host root still
/// get one of each. Keys are not here: `add_key`, `keyctl` and
/// `request_key` are refused by seccomp (`attacks::k1_k2_k3_k4_k10_dangerous_syscalls_fail`), so
/// no sandbox can take a key or its quota.
#[tokio::test(flavor = "multi_thread")]
async fn k12_one_sandbox_exhausting_per_user_counters_leaves_others_and_the_host_theirs() {
    let Some((_srv, c, a, b)) = two_sandboxes().await else {
        return;
    };
    let hog = c
        .start_process(
            &a,
            &ExecRequest {
                cmd: vec!["/usr/bin/python3".into(), "-c".into(), EXHAUST.into()],
                background: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut took = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while took.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the exhausting process never finished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        took = run(&c, &a, "cat /tmp/k12.json 2>/dev/null").await.stdout;
    }
    // While A holds everything: B and host root each take one of every counter.
    let in_b = py(&c, &b, TAKE_ONE).await;
    let host = std::process::Command::new("/usr/bin/python3")
        .args(["-c", TAKE_ONE])
        .output()
        .unwrap();
    c.kill(&a, hog).await.unwrap();

    let took: serde_json::Value = serde_json::from_str(&took).unwrap();
    let in_b: serde_json::Value =
        serde_json::from_str(&in_b.stdout).unwrap_or_else(|e| panic!("{e}: {in_b:?}"));
    let host: serde_json::Value = serde_json::from_slice(&host.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&host.stderr)));
    for (counter, errno) in COUNTERS {
        let (n, e) = (took[counter][0].as_i64(), took[counter][1].as_i64());
        assert!(
            n > Some(0) && e == Some(*errno),
            "sandbox A did not exhaust {counter}: {took}"
        );
        assert_eq!(
            in_b[counter], 0,
            "{counter}: B was refused while A held its all: {in_b} (A: {took})"
        );
        assert_eq!(
            host[counter], 0,
            "{counter}: host root was refused while A held its all: {host} (A: {took})"
        );
    }
}

// ---------------------------------------------------------------- K13

/// Everything a sandbox can read that has named other sandboxes or host paths: `/proc` views of
/// mounts, cgroups and the kernel command line, and every block device, loop device and cgroup
/// file under `/sys` (names, link targets and the contents of small files).
const LOOK_AROUND: &str = r#"
import os
out = []
for p in ["/proc/self/mountinfo", "/proc/1/mountinfo", "/proc/self/mounts", "/proc/cmdline",
          "/proc/self/cgroup", "/proc/1/cgroup", "/proc/self/cpuset", "/proc/swaps",
          "/proc/self/mountstats"]:
    try:
        out.append("== %s\n%s" % (p, open(p, errors="replace").read()))
    except OSError as e:
        out.append("== %s: %s" % (p, e))
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for l in ["exe", "cwd", "root"]:
            try: out.append("%s/%s -> %s" % (pid, l, os.readlink("/proc/%s/%s" % (pid, l))))
            except OSError: pass
def walk(top):
    for d, dirs, files in os.walk(top, followlinks=False):
        for n in dirs + files:
            p = os.path.join(d, n)
            out.append(p)
            if os.path.islink(p):
                out.append("  -> " + os.readlink(p))
            elif n in files and ("block" in p or "loop" in p or "cgroup" in p or n == "backing_file"):
                try:
                    with open(p, errors="replace") as f:
                        out.append("  = " + f.read(4096))
                except OSError:
                    pass
for top in ["/sys/block", "/sys/class/block", "/sys/dev/block", "/sys/devices/virtual/block",
            "/sys/fs/cgroup", "/sys/module/loop"]:
    walk(top)
for d, dirs, files in os.walk("/sys", followlinks=False):
    for n in files:
        if n == "backing_file":
            p = os.path.join(d, n)
            try: out.append(p + " = " + open(p).read())
            except OSError as e: out.append(p + ": %s" % e)
print("\n".join(out))
"#;

/// Attack list row K13: from inside, nothing names another sandbox, the data directory, or where the
/// host keeps burrow (the guest binary's path): not mountinfo (overlay layers, bind sources), not
/// the loop devices' backing files under `/sys`, not cgroup paths, not the host's kernel command
/// line.
#[tokio::test(flavor = "multi_thread")]
async fn k13_no_other_sandbox_and_no_host_path_is_visible_inside() {
    let Some((srv, c, a, b)) = two_sandboxes().await else {
        return;
    };
    let seen = py(&c, &a, LOOK_AROUND).await;
    assert_eq!(seen.exit_code, Some(0), "{seen:?}");
    assert!(
        seen.stdout.contains("== /proc/self/mountinfo\n") && seen.stdout.contains(" / / "),
        "the probe read nothing: {}",
        seen.stdout
    );
    let exe_dir = Path::new(BURROW).parent().unwrap();
    let host_cmdline = std::fs::read_to_string("/proc/cmdline").unwrap();
    let needles = [
        ("another sandbox's id", b.as_str()),
        ("the data directory", srv.data.to_str().unwrap()),
        ("the test's temporary directory", "burrow-test-"),
        ("burrow's build directory", exe_dir.to_str().unwrap()),
        ("the sandboxes directory", "/sandboxes/"),
        ("the host's kernel command line", host_cmdline.trim()),
    ];
    for line in seen.stdout.lines() {
        for (what, needle) in needles {
            assert!(!line.contains(needle), "{what} is visible inside: {line:?}");
        }
    }
}

// ---------------------------------------------------------------- R4

/// Attack list row R4: a sandbox spins every core and hammers its disk with synchronous writes. Its
/// own cgroup's CPU accounting stays within its quota, its synchronous writes within its plan's
/// write bandwidth, and another sandbox still answers. (How much the load moves the neighbour's
/// latency is a `burrow bench` row, not an assertion.)
#[tokio::test(flavor = "multi_thread")]
async fn r4_a_sandbox_spinning_every_core_and_its_disk_stays_in_its_budget() {
    if !require_root("starting sandboxes") {
        return;
    }
    const WRITE_BPS: u64 = 4 << 20;
    let plans = tempfile::NamedTempFile::new().unwrap();
    let noisy = serde_json::json!([{ "name": "noisy", "limits": {
        "cpu_millis": 500, "memory_mib": 512, "pids": 256, "disk_mib": 512, "nofile": 1024,
        "output_bytes": 1048576, "max_duration_s": 3600,
        "disk_write_bps": WRITE_BPS, "disk_write_iops": 200 } }]);
    std::fs::write(plans.path(), noisy.to_string()).unwrap();
    let srv = TestServer::start_with_env(&[("BURROW_PLANS", plans.path().to_str().unwrap())]).await;
    let c = srv.client();
    let a = c
        .create(&CreateSandbox {
            plan: Some("noisy".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let b = c.create(&CreateSandbox::default()).await.unwrap().id;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let load = format!(
        "for i in $(seq {cores}); do (while :; do :; done) & done; \
         python3 -c 'import os\nb = b\"x\" * 4096\nwhile True:\n  f = os.open(\"/workspace/storm\", os.O_WRONLY | os.O_CREAT)\n  os.write(f, b); os.fsync(f); os.close(f)' & wait"
    );
    let bg = c
        .start_process(
            &a,
            &ExecRequest {
                background: true,
                ..sh(&load)
            },
        )
        .await
        .unwrap();
    let usage = || -> u64 {
        std::fs::read_to_string(format!("/sys/fs/cgroup/cpuacct/burrow/{a}/cpuacct.usage"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (u0, t0) = (usage(), Instant::now());
    // The neighbour answers while the load runs.
    for _ in 0..5 {
        assert_eq!(ok(&c, &b, "echo ok").await, "ok\n");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let (u1, wall) = (usage(), t0.elapsed());
    let used = (u1 - u0) as f64 / wall.as_nanos() as f64;
    // The quota is half a core per 100 ms period; one period of slack for the window's edges.
    let allowed = 0.5 + 0.5 * 0.1 / wall.as_secs_f64() + 0.02;
    assert!(
        used <= allowed,
        "sandbox A used {used:.2} CPUs over {wall:?} with a quota of 0.5"
    );
    assert!(used >= 0.25, "the load did not run: {used:.2} CPUs");

    // Synchronous writes (O_DIRECT, then fsync'd) go no faster than the plan's bandwidth.
    let r = py(
        &c,
        &a,
        "import os, time, mmap\nbuf = mmap.mmap(-1, 1 << 20)\nbuf.write(b'y' * (1 << 20))\n\
         f = os.open('/workspace/direct', os.O_WRONLY | os.O_CREAT | os.O_DIRECT)\n\
         t = time.monotonic(); n = 0\nwhile time.monotonic() - t < 3:\n  n += os.pwrite(f, buf, n % (64 << 20))\nos.fsync(f)\n\
         print(n, time.monotonic() - t)",
    )
    .await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    let v: Vec<f64> = r
        .stdout
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    let rate = v[0] / v[1];
    assert!(
        rate <= WRITE_BPS as f64 * 1.5 + (1 << 20) as f64 / v[1],
        "synchronous writes ran at {:.1} MiB/s with a limit of {} MiB/s",
        rate / (1 << 20) as f64,
        WRITE_BPS >> 20
    );
    assert!(v[0] > 0.0, "{r:?}");
    c.kill(&a, bg).await.unwrap();
    assert_eq!(ok(&c, &b, "echo ok").await, "ok\n");
}

// ---------------------------------------------------------------- K11

/// Reads a terminal session until `marker` shows up (or 20 s pass); returns what it printed.
async fn read_until(s: &mut burrow_client::Session, marker: &str) -> String {
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains(marker) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), s.next()).await {
            Ok(Ok(Some(Output::Stdout(b) | Output::Stderr(b)))) => {
                seen.push_str(&String::from_utf8_lossy(&b))
            }
            Ok(Ok(Some(Output::Event(_)))) | Err(_) => {}
            Ok(_) => break,
        }
    }
    seen
}

/// What follows the last `marker` in terminal output, up to the first character that is not a
/// digit, a lower-case letter or a comma (terminal output is full of escapes and echoes).
fn after(text: &str, marker: &str) -> Option<String> {
    let rest = &text[text.rfind(marker)? + marker.len()..];
    let v: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || c.is_ascii_lowercase() || *c == ',')
        .collect();
    (!v.is_empty()).then_some(v)
}

/// Attack list row K11, through the real terminal API: a program in one terminal pushes a command
/// into its own terminal, `/dev/tty` and a second terminal's PTY with TIOCSTI. Each is refused,
/// and the command runs nowhere: not in either shell, not on the host.
#[tokio::test(flavor = "multi_thread")]
async fn k11_tiocsti_pushes_nothing_into_any_terminal() {
    if !require_root("starting sandboxes") {
        return;
    }
    let srv = TestServer::start().await;
    let c = srv.client();
    let id = c.create(&CreateSandbox::default()).await.unwrap().id;
    let mut t1 = c.terminal(&id, 80, 24, None).await.unwrap();
    let mut t2 = c.terminal(&id, 80, 24, None).await.unwrap();
    t2.stdin(b"echo T2=$(tty)\n").await.unwrap();
    let t2_out = read_until(&mut t2, "T2=/dev/pts/").await;
    let t2_tty = format!(
        "/dev/pts/{}",
        after(&t2_out, "T2=/dev/pts/").unwrap_or_else(|| panic!("no tty in {t2_out:?}"))
    );
    let host_marker = std::env::temp_dir().join(format!("k11-{}", std::process::id()));
    let inject = format!("touch /tmp/k11-injected {}\n", host_marker.display());
    let code = format!(
        "import fcntl, os, termios\nres = []\n\
         for path in [None, '/dev/tty', '{t2_tty}']:\n\
         \x20 fd = 0 if path is None else os.open(path, os.O_RDWR)\n\
         \x20 try:\n\
         \x20\x20 for ch in {inject:?}: fcntl.ioctl(fd, termios.TIOCSTI, ch.encode())\n\
         \x20\x20 res.append('ok')\n\
         \x20 except OSError as e: res.append(str(e.errno))\n\
         print('TIOCSTI=' + ','.join(res))\n"
    );
    std::fs::write(host_marker.with_extension("py"), &code).unwrap();
    c.upload(&id, "/tmp/k11.py", code.into_bytes())
        .await
        .unwrap();
    t1.stdin(b"python3 /tmp/k11.py\n").await.unwrap();
    let t1_out = read_until(&mut t1, "TIOCSTI=").await;
    let _ = std::fs::remove_file(host_marker.with_extension("py"));
    // Give any pushed input time to reach a shell and run, then ask each shell to show itself.
    tokio::time::sleep(Duration::from_millis(500)).await;
    t1.stdin(b"echo T1-DONE\n").await.unwrap();
    t2.stdin(b"echo T2-DONE\n").await.unwrap();
    let t1_rest = read_until(&mut t1, "T1-DONE\r\n").await;
    read_until(&mut t2, "T2-DONE\r\n").await;
    let res = format!("{t1_out}{t1_rest}");
    let line = after(&res, "TIOCSTI=").unwrap_or_else(|| panic!("no result in {res:?}"));
    assert_eq!(line, "1,1,1", "TIOCSTI was not refused (EPERM) everywhere");
    assert_eq!(
        ok(&c, &id, "ls /tmp/k11-injected 2>/dev/null | wc -l")
            .await
            .trim(),
        "0",
        "the pushed command ran inside"
    );
    assert!(!host_marker.exists(), "the pushed command ran on the host");
}

// ---------------------------------------------------------------- uid slots

/// The highest uid slot builds a real sandbox whose root maps to the top range below the invalid
/// uid `u32::MAX`, and the slot past it is refused with an error instead of wrapping to host uids
/// below the base (or panicking).
#[test]
fn the_top_uid_slot_maps_below_the_invalid_uid_and_the_next_is_refused() {
    use burrow_node::namespace::{uid_base, NamespaceBackend, NamespaceConfig, UID_SLOTS};
    use burrow_node::{Backend, SandboxSpec};
    if !require_root("building a sandbox on the real kernel") {
        return;
    }
    let top = UID_SLOTS - 1;
    let base = uid_base(top).expect("the top slot has a range");
    let end = u64::from(base) + 65535;
    assert!(
        end < u64::from(u32::MAX) && end + 65536 >= u64::from(u32::MAX),
        "the top range is not the last one below the invalid uid: {base}"
    );
    assert!(uid_base(UID_SLOTS).is_none() && uid_base(u32::MAX).is_none());

    let tmp = tempfile::Builder::new()
        .prefix("burrow-test-")
        .tempdir()
        .unwrap();
    std::fs::write(tmp.path().join("owner.pid"), std::process::id().to_string()).unwrap();
    let backend = NamespaceBackend::new(NamespaceConfig {
        data_dir: tmp.path().join("data"),
        init_exe: PathBuf::from(BURROW),
        guest_exe: None,
        storage: Default::default(),
    })
    .unwrap();
    let spec = |id: &str, slot: u32| SandboxSpec {
        id: id.into(),
        hostname: id.into(),
        image: "system".into(),
        limits: burrow_types::Plan::defaults()[0].limits.clone(),
        uid_slot: slot,
        env: BTreeMap::new(),
        net: None,
    };
    let id = format!("topslot{}", std::process::id());
    let info = backend.create(&spec(&id, top)).unwrap();
    let map = std::fs::read_to_string(format!("/proc/{}/uid_map", info.pid)).unwrap();
    backend.destroy(&id, Some(&info)).unwrap();
    assert_eq!(
        map.split_whitespace().collect::<Vec<_>>(),
        ["0", &base.to_string(), "65536"]
    );
    let past = backend.create(&spec(&format!("pastslot{}", std::process::id()), UID_SLOTS));
    assert!(past.is_err(), "a slot past the top was built");
}

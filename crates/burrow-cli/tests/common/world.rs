//! A small world of network namespaces for network tests, so no packet leaves what the test made:
//!
//! ```text
//!  test process (host netns)          server netns                       fake-internet netns
//!  127.0.0.1:P ──relay (setns)──► 0.0.0.0:7070 burrow up   up0 198.51.100.1 ══ up0 198.51.100.2
//!                                 bw* veths ── sandboxes                   lo: 203.0.113.10  (HTTP 80,
//!                                 burrow's nft table                        TLS banner 443, DNS 53,
//!                                                                           hold-open 7000)
//!                                                                          lo: 192.168.77.1 (private)
//!                                                                          lo: 169.254.169.254 (metadata)
//! ```
//! The fake internet routes the sandbox range back to the server namespace, so an inbound attempt
//! really reaches the firewall. Namespaces are named `bwt-<pid>-<n>-{s,i}`; `Drop` deletes them and
//! [`sweep_dead_worlds`] deletes those of test processes that were killed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const API_PORT: u16 = 7070;
/// The fake internet's web, TLS-banner and DNS host; every `*.test` name resolves to it.
pub const FAKE_HOST: &str = "203.0.113.10";
/// A private-range address on the fake internet (dropped by default).
pub const PRIVATE_HOST: &str = "192.168.77.1";
pub const METADATA: &str = "169.254.169.254";
/// The server namespace's own address on its uplink.
pub const SERVER_UPLINK: &str = "198.51.100.1";
/// Domain of Host-routed port URLs.
pub const DOMAIN: &str = "sb.test";
/// The hold-open port: accepts nothing, so connections sit in its backlog.
pub const HOLD_PORT: u16 = 7000;

static WORLDS: AtomicUsize = AtomicUsize::new(0);

/// The fake internet: HTTP on 80 (says which Host it saw), a TLS banner on 443 (answers
/// `tls-ok` to any ClientHello), DNS on 53 (every `*.test` and `fake.internet` is FAKE_HOST),
/// and a listener on 7000 with a deep backlog that never accepts.
const FAKE_INTERNET_PY: &str = include_str!("fake_internet.py");

pub struct World {
    pub server_ns: String,
    pub inet_ns: String,
    fake: Option<Child>,
    api: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

fn ip(args: &[&str]) {
    let out = Command::new("/usr/sbin/ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

impl World {
    pub fn new() -> World {
        let n = WORLDS.fetch_add(1, Ordering::SeqCst);
        let base = format!("bwt-{}-{n}", std::process::id());
        let (s, i) = (format!("{base}-s"), format!("{base}-i"));
        let mut w = World {
            server_ns: s.clone(),
            inet_ns: i.clone(),
            fake: None,
            api: "127.0.0.1:0".parse().unwrap(),
            _dir: tempfile::tempdir().unwrap(),
        };
        // Registered in `w` first, so a failed step still deletes what was made.
        ip(&["netns", "add", &s]);
        ip(&["netns", "add", &i]);
        for (ns, addr, peer) in [
            (&s, "198.51.100.1/24", "198.51.100.2"),
            (&i, "198.51.100.2/24", ""),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            if ns == &s {
                ip(&[
                    "-n", ns, "link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns",
                    &i,
                ]);
            }
            ip(&["-n", ns, "addr", "add", addr, "dev", "up0"]);
            ip(&["-n", ns, "link", "set", "up0", "up"]);
            if !peer.is_empty() {
                ip(&["-n", ns, "route", "add", "default", "via", peer]);
            }
        }
        for a in [FAKE_HOST, PRIVATE_HOST, METADATA] {
            ip(&["-n", &i, "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        // Inbound attempts at sandboxes really reach the server namespace's firewall.
        ip(&[
            "-n",
            &i,
            "route",
            "add",
            "10.200.0.0/16",
            "via",
            "198.51.100.1",
        ]);
        let script = w._dir.path().join("fake_internet.py");
        std::fs::write(&script, FAKE_INTERNET_PY).unwrap();
        let mut fake = Command::new("/usr/sbin/ip");
        // `ip netns exec` execs the program itself (no fork), so the tie reaches python.
        fake.args(["netns", "exec", &i, "/usr/bin/python3"])
            .arg(&script)
            .arg(FAKE_HOST)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        w.fake = Some(super::spawn_tied(fake).expect("start the fake internet"));
        w.api = start_relay(&s);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !w
            .inet(&["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/80"])
            .status
            .success()
        {
            assert!(Instant::now() < deadline, "the fake internet did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        w
    }

    /// The fake internet's process (it dies with the test process).
    pub fn fake_pid(&self) -> u32 {
        self.fake.as_ref().map(|c| c.id()).unwrap_or_default()
    }

    /// Where the test reaches the API (a relay into the server namespace).
    pub fn api_addr(&self) -> std::net::SocketAddr {
        self.api
    }

    /// Runs a command in the fake-internet namespace.
    pub fn inet(&self, argv: &[&str]) -> Output {
        Command::new("/usr/sbin/ip")
            .args(["netns", "exec", &self.inet_ns])
            .args(argv)
            .output()
            .expect("ip netns exec")
    }

    /// Runs a command in the server namespace (e.g. `nft list ruleset`, `ip link`).
    pub fn server(&self, argv: &[&str]) -> Output {
        Command::new("/usr/bin/nsenter")
            .arg(format!("--net=/run/netns/{}", self.server_ns))
            .args(argv)
            .output()
            .expect("ip netns exec")
    }

    pub fn server_stdout(&self, argv: &[&str]) -> String {
        String::from_utf8_lossy(&self.server(argv).stdout).into_owned()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut c) = self.fake.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.server_ns, &self.inet_ns] {
            let _ = Command::new("/usr/sbin/ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Deletes the namespaces of test processes that no longer exist.
pub fn sweep_dead_worlds() {
    let Ok(rd) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for name in rd.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
        let Some(pid) = name
            .strip_prefix("bwt-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("/usr/sbin/ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A TCP relay from a loopback port of the test's namespace to the API inside the server
/// namespace: each upstream socket is made by a thread that has entered that namespace.
fn start_relay(server_ns: &str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let ns = ns_path(server_ns);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(down) = conn else { continue };
            let ns = ns.clone();
            std::thread::spawn(move || {
                let up = burrow_linux::net::in_netns(&ns, || {
                    TcpStream::connect(("127.0.0.1", API_PORT))
                });
                let Ok(up) = up else { return };
                pipe(down, up);
            });
        }
    });
    addr
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let t = std::thread::spawn(move || {
        copy(&mut a2, &mut b2);
    });
    let (mut a, mut b) = (a, b);
    copy(&mut b, &mut a);
    let _ = t.join();
}

fn copy(from: &mut TcpStream, to: &mut TcpStream) {
    let mut buf = [0u8; 16384];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}
